"""The endpoints beside chat: embeddings, legacy completions, image generation.

They are authenticated, routed (aliases, ``backend:model``, failover) and seen by
``flow_done`` like chat, but their bodies are not canonical chat: the request hooks do not
run and ``flow.request`` is unavailable (``flow.frontend`` says which endpoint it was). A
backend serves them when its provider lists the endpoint (OpenAI-compatible backends pass
them through as they are; Gemini translates embeddings); any other backend answers with a
clear error naming what it lacks.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from .codecs import get_codec
from .codecs.base import dumps
from .context import CONTEXT
from .errors import ProxyError, bad_request
from .flow import Flow
from .pipeline import RETRYABLE, SSE_HEADERS, _done, _spawn, authenticate, read_json
from .providers import UpstreamReply

OPENAI = get_codec("openai_chat")


async def forward(request: web.Request, endpoint: str) -> web.StreamResponse:
    """Serve ``/v1/<endpoint>`` through the backend the body's model routes to."""
    ctx = request.app[CONTEXT]
    flow = Flow(f"openai_{endpoint.split('/')[0]}", {}, "", False)
    flow.context = ctx
    response: web.StreamResponse | None = None
    try:
        flow.client = authenticate(request, ctx)
        body = await read_json(request)
        flow.raw_body = await request.read()  # aiohttp keeps the bytes it read: no copy
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required and must be a non-empty string", "model")
        flow.raw_request, flow.model, flow.stream = body, model, body.get("stream") is True
        targets = ctx.router.resolve(model)
        for i, target in enumerate(targets):
            flow.target = target
            try:
                result = await target.provider.forward(flow, target, endpoint, flow.stream)
                break
            except ProxyError as error:
                if error.status not in RETRYABLE or i == len(targets) - 1:
                    raise
        if isinstance(result, UpstreamReply):
            payload = result.body if result.body is not None else dumps(result.response)
            response = web.Response(body=payload, content_type="application/json")
            await response.prepare(request)
            await response.write_eof()
            flow.status = 200
        else:
            response = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await response.prepare(request)
            flow.status = 200
            try:
                assert result.chunks is not None
                async for chunk in result.chunks:
                    if flow.first_token_at is None:
                        flow.first_token_at = time.monotonic()
                    await response.write(chunk)
            finally:
                await result.close()
            await response.write_eof()
    except ProxyError as error:
        flow.error = error
        if response is None:
            flow.status = error.status
            response = web.Response(body=dumps(OPENAI.error_body(error)), status=error.status, content_type="application/json", headers=error.headers or None)
        else:
            try:
                await response.write(b"\n\n" + OPENAI.error_event(error))
                await response.write_eof()
            except (ConnectionError, RuntimeError):
                pass
    except asyncio.CancelledError:
        flow.error = ProxyError(499, "client disconnected")
        _spawn(_done(flow, ctx))
        raise
    except ConnectionError:
        flow.error = ProxyError(499, "client disconnected")
    await _done(flow, ctx)
    return response


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await forward(request, "embeddings")


async def completions(request: web.Request) -> web.StreamResponse:
    return await forward(request, "completions")


async def images(request: web.Request) -> web.StreamResponse:
    return await forward(request, "images/generations")


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


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", ""):
        app.router.add_post(prefix + "/embeddings", embeddings)
        app.router.add_post(prefix + "/completions", completions)
        app.router.add_post(prefix + "/images/generations", images)
