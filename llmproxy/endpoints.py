"""The endpoints beside chat: embeddings, legacy completions, image generation.

They are authenticated, routed (aliases, ``backend:model``, failover) and seen by
``flow_done`` like chat, but their bodies are not canonical chat: the request hooks do not
run and ``flow.request`` is unavailable (``flow.frontend`` says which endpoint it was). A
backend serves them when its provider lists the endpoint (OpenAI-compatible backends pass
them through as they are; Gemini translates embeddings); any other backend answers with a
clear error naming what it lacks.
"""

from __future__ import annotations

from aiohttp import web

from .codecs import get_codec
from .codecs.base import dumps
from .context import ProxyContext
from .errors import bad_request
from .flow import Flow
from .pipeline import Writer, failover, handle
from .providers import UpstreamReply

OPENAI = get_codec("openai_chat")


async def forward(request: web.Request, endpoint: str) -> web.StreamResponse:
    """Serve ``/v1/<endpoint>`` through the backend the body's model routes to."""

    async def run(flow: Flow, ctx: ProxyContext, writer: Writer) -> None:
        model = flow.raw_request.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required and must be a non-empty string", "model")
        flow.model, flow.stream = model, flow.raw_request.get("stream") is True
        result = await failover(flow, ctx, lambda target: target.provider.forward(flow, target, endpoint, flow.stream))
        if isinstance(result, UpstreamReply):
            await writer.json(result.body if result.body is not None else dumps(result.response))
        else:
            await writer.relay_bytes(result)

    return await handle(request, OPENAI, run=run, frontend=f"openai_{endpoint.split('/')[0]}")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await forward(request, "embeddings")


async def completions(request: web.Request) -> web.StreamResponse:
    return await forward(request, "completions")


async def images(request: web.Request) -> web.StreamResponse:
    return await forward(request, "images/generations")


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", ""):
        app.router.add_post(prefix + "/embeddings", embeddings)
        app.router.add_post(prefix + "/completions", completions)
        app.router.add_post(prefix + "/images/generations", images)
