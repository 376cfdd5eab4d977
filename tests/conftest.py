"""Shared fixtures: fake upstreams on real sockets (see tests/fakes/), backends written for
one test, and llmproxy itself on a real socket."""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from fakes.anthropic_upstream import FakeAnthropic
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from fakes.responses_upstream import FakeResponses

from llmproxy.testing import RunningProxy, start_app, start_proxy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """A started fake OpenAI Chat Completions upstream; script it with ``fake_openai.script(...)``."""
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    """A started fake Anthropic Messages upstream (``base_url`` without ``/v1``)."""
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def fake_responses() -> AsyncIterator[FakeResponses]:
    """A started fake OpenAI Responses upstream (``base_url`` ends in ``/v1``)."""
    async with FakeResponses() as fake:
        yield fake


@pytest.fixture
async def fake_gemini() -> AsyncIterator[FakeGemini]:
    """A started fake Gemini upstream (``base_url`` ends in ``/v1beta``)."""
    async with FakeGemini() as fake:
        yield fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client whose every request is bounded (10 s): a hang fails the test, never the run."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
        yield session


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """``await serve(handler)``: a real server answering every path and method with
    ``handler`` (a backend written for one test); returns its URL. Stopped after the test."""
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
async def proxies() -> AsyncIterator[Callable[[dict[str, Any], list[tuple[str, Any]]], Awaitable[RunningProxy]]]:
    """``await proxies(config, plugins)``: llmproxy on a real socket with only ``plugins``
    (no entry points) and no shutdown drain. Every one started is stopped after the test."""
    started: list[RunningProxy] = []

    async def start(config: dict[str, Any], plugins: list[tuple[str, Any]]) -> RunningProxy:
        proxy = await start_proxy({"proxy": {"drain_timeout": 0}, **config}, plugins=plugins, entry_points=False)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()
