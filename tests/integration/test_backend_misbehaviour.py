"""Backends that answer what their API never would — a redirect, a page of HTML, a stream cut
inside its first frame, a 200 holding an error — and what each client sees, over real sockets.

The backends here are small aiohttp servers written for each case (the protocol fakes in
tests/fakes answer like the real APIs, which is not the point here).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_openai
import pytest
from aiohttp import web

from llmproxy.errors import ProxyError
from llmproxy.testing import RunningProxy, start_app, start_proxy

PLUGINS = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini)]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEYS = {"OA_KEY": "sk-oa-redirect-1111", "AN_KEY": "sk-ant-redirect-2222", "GM_KEY": "AIza-redirect-3333"}


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def serve(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        url, runner = await start_app(app)
        runners.append(runner)
        return url

    yield serve
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[RunningProxy]]]:
    started: list[RunningProxy] = []

    async def start(config: dict[str, Any]) -> RunningProxy:
        proxy = await start_proxy({"proxy": {"drain_timeout": 0, "response_headers": True}, **config}, plugins=PLUGINS, entry_points=False)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


def backends(url: str) -> dict[str, Any]:
    return {
        "oa": {"type": "openai", "base_url": url + "/v1", "api_keys": ["${OA_KEY}"]},
        "an": {"type": "anthropic", "base_url": url, "api_keys": ["${AN_KEY}"]},
        "gm": {"type": "gemini", "base_url": url + "/v1beta", "api_keys": ["${GM_KEY}"]},
    }


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def post(proxy: RunningProxy, path: str, body: dict[str, Any]) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as http, http.post(proxy.url + path, json=body) as response:
        raw = await response.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        return response.status, data, raw


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("backend", ["oa", "an", "gm"])
async def test_a_redirect_is_not_followed_and_no_key_leaves(backend: str, status: int, serve: Any, proxies: Any) -> None:
    """aiohttp drops only Authorization on a redirect to another host: followed, the
    Anthropic and Gemini keys would go wherever Location points."""
    elsewhere: list[dict[str, str]] = []

    async def sink(request: web.Request) -> web.Response:
        elsewhere.append(dict(request.headers))
        return web.json_response({"error": "should never be asked"})

    sink_url = await serve(sink)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": sink_url + request.path + "?token=secret-in-query"})

    proxy = await proxies({"backends": backends(await serve(redirect))})
    answer = await post(proxy, "/v1/chat/completions", {"model": f"{backend}:some-model", **CHAT})
    assert answer[0] == 502, answer
    message = answer[1]["error"]["message"]
    assert f"HTTP {status}" in message and "redirect" in message and sink_url in message and "secret-in-query" not in message
    assert elsewhere == []
    streamed = await post(proxy, "/v1/chat/completions", {"model": f"{backend}:other", **CHAT, "stream": True})
    assert streamed[0] == 502 and elsewhere == []
    with pytest.raises(ProxyError, match=f"HTTP {status}, a redirect"):  # what discovery and `llmproxy check` ask
        await proxy.context.providers[backend].list_models()
    assert elsewhere == []
