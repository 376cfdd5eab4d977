"""Backend health and model discovery over real sockets: llmproxy (a real server) polls the
model lists of fake upstreams (real servers, ``tests/fakes/listing.py``) of each protocol.

What the upstream received (its model-list requests and their headers) proves the polling;
what clients see (``GET /v1/models``, ``/readyz``, chat answers) proves its effects.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import aiohttp
import llmproxy_anthropic
import llmproxy_gemini
import llmproxy_openai
import pytest

from fakes.listing import ListingAnthropic, ListingGemini, ListingOpenAI
from llmproxy.testing import RunningProxy

BOUND = 10.0
KEY = "sk-discovery-3e5a7c9b1d"
FAST = {"interval": 0.05, "unhealthy_after": 2, "timeout": 0.5}

Start = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCOVERY_KEY", KEY)


@pytest.fixture
def start(proxies: Any) -> Start:
    plugins = [("openai", llmproxy_openai), ("anthropic", llmproxy_anthropic), ("gemini", llmproxy_gemini)]
    return lambda config: proxies({"proxy": {"drain_timeout": 1}, **config}, plugins)



async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


def backend(kind: str, fake: Any, **settings: Any) -> dict[str, Any]:
    return {"type": kind, "base_url": fake.base_url, "api_keys": ["${DISCOVERY_KEY}"], **settings}


async def test_discovered_models_are_listed_and_the_backend_is_healthy(start: Start, http: aiohttp.ClientSession) -> None:
    async with ListingOpenAI(models=["qwen3-coder", "llama3.3"]) as fake:
        proxy = await start({"backends": {"local": backend("openai", fake, discovery=FAST)}, "default_backend": "local"})
        provider = proxy.context.providers["local"]
        await until(lambda: provider.healthy is True, "the first poll")
        assert fake.list_headers[0]["Authorization"] == f"Bearer {KEY}"
        status, body = await get(http, proxy.url + "/v1/models")
        ids = [m["id"] for m in body["data"]]
        assert {"local:qwen3-coder", "local:llama3.3", "qwen3-coder", "llama3.3"} <= set(ids)
        # The backend keeps polling, and its status shows what it found (never the key).
        await until(lambda: len(fake.list_headers) >= 3, "more polls")
        status_json = proxy.context.backend_status()["local"]
        assert status_json["healthy"] is True and status_json["models"] == ["qwen3-coder", "llama3.3"]
        assert status_json["discovery"]["failures"] == 0 and status_json["discovery"]["discovered_models"] == ["qwen3-coder", "llama3.3"]
        assert KEY not in repr(status_json)


async def test_failed_polls_mark_the_backend_unhealthy_until_one_succeeds(start: Start, http: aiohttp.ClientSession) -> None:
    async with ListingOpenAI() as fake:
        proxy = await start({"backends": {"local": backend("openai", fake, discovery=FAST)}, "default_backend": "local"})
        provider = proxy.context.providers["local"]
        await until(lambda: provider.healthy is True, "the first poll")
        assert (await get(http, proxy.url + "/readyz"))[0] == 200

        fake.list_status = 401
        await until(lambda: provider.healthy is False, "two failed polls")
        status, body = await get(http, proxy.url + "/readyz")
        # The host still accepts connections, but the backend is not ready.
        assert status == 503 and body["reason"] == "no reachable backend is healthy"
        assert body["backends"]["local"]["state"] == "unhealthy"
        assert "401" in body["backends"]["local"]["detail"] and "Incorrect API key" in body["backends"]["local"]["detail"]
        assert KEY not in repr(body)

        fake.list_status = None
        await until(lambda: provider.healthy is True, "a successful poll")
        status, body = await get(http, proxy.url + "/readyz")
        assert status == 200 and body["backends"]["local"]["state"] == "reachable"
        assert proxy.context.backend_status()["local"]["discovery"]["failures"] == 0


async def test_an_unhealthy_target_is_skipped_until_it_recovers(start: Start, http: aiohttp.ClientSession) -> None:
    async with ListingOpenAI() as sick, ListingOpenAI() as spare:
        proxy = await start({
            "backends": {"sick": backend("openai", sick, discovery=FAST), "spare": backend("openai", spare)},
            "models": {"m": {"targets": ["sick:gpt-4o-mini", "spare:gpt-4o-mini"]}},
        })
        provider = proxy.context.providers["sick"]
        await until(lambda: provider.healthy is True, "the first poll")
        sick.list_status = 503
        await until(lambda: provider.healthy is False, "two failed polls")
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(proxy.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
        assert not sick.requests and len(spare.requests) == 1  # sick was never asked
        sick.list_status = None
        await until(lambda: provider.healthy is True, "a successful poll")
        async with http.post(proxy.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
        assert len(sick.requests) == 1


async def test_one_failed_poll_is_not_yet_unhealthy(start: Start) -> None:
    async with ListingOpenAI() as fake:
        fake.list_status = 500
        proxy = await start({"backends": {"local": backend("openai", fake, discovery={"interval": 30, "unhealthy_after": 2})}, "default_backend": "local"})
        provider = proxy.context.providers["local"]
        poller = provider.discovery
        assert poller is not None
        await until(lambda: poller.failures == 1, "the first poll")
        assert provider.healthy is None  # unknown: one failure is below unhealthy_after
        await poller.poll()
        assert provider.healthy is False


async def test_anthropic_and_gemini_lists_with_their_own_headers(start: Start) -> None:
    async with ListingAnthropic(models=["claude-a", "claude-b"]) as anthropic, ListingGemini(models=["gemini-x"]) as gemini:
        proxy = await start({"backends": {"claude": backend("anthropic", anthropic, discovery=FAST), "gem": backend("gemini", gemini, discovery=FAST)}})
        claude, gem = proxy.context.providers["claude"], proxy.context.providers["gem"]
        await until(lambda: claude.healthy is True and gem.healthy is True, "both first polls")
        assert claude.discovered_models == ["claude-a", "claude-b"]
        assert gem.discovered_models == ["gemini-x"]  # "models/gemini-x" without its prefix
        sent = anthropic.list_headers[0]
        assert sent["x-api-key"] == KEY and sent["anthropic-version"] == "2023-06-01" and "Authorization" not in sent
        assert gemini.list_headers[0]["x-goog-api-key"] == KEY


async def test_a_hanging_poll_never_holds_up_requests(start: Start, http: aiohttp.ClientSession) -> None:
    async with ListingOpenAI() as fake:
        fake.list_hang = True
        proxy = await start({"backends": {"local": backend("openai", fake, discovery={"interval": 0.05, "unhealthy_after": 1, "timeout": 0.3})}, "default_backend": "local"})
        await until(lambda: len(fake.list_headers) == 1, "the poll to be sent")
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(proxy.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200  # answered while the poll hangs
        provider = proxy.context.providers["local"]
        await until(lambda: provider.healthy is False, "the poll to time out")
        assert provider.discovery is not None and "no model list within 0.3s" in (provider.discovery.last_error or "")


async def test_discovery_is_off_by_default(start: Start, http: aiohttp.ClientSession) -> None:
    async with ListingOpenAI() as fake:
        proxy = await start({"backends": {"local": backend("openai", fake)}, "default_backend": "local"})
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(proxy.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
        provider = proxy.context.providers["local"]
        assert provider.healthy is None and provider.discovery is None
        assert "discovery" not in proxy.context.backend_status()["local"]
        assert fake.list_headers == []


async def test_polling_stops_when_the_proxy_stops(start: Start) -> None:
    async with ListingOpenAI() as fake:
        proxy = await start({"backends": {"local": backend("openai", fake, discovery=FAST)}, "default_backend": "local"})
        await until(lambda: len(fake.list_headers) >= 2, "polls")
        await proxy.stop()
        polls = len(fake.list_headers)
        await asyncio.sleep(0.3)  # six intervals: none may poll now
        assert len(fake.list_headers) == polls
