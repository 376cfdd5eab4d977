"""Test kit for plugin authors (a pytest plugin, loaded automatically with llmproxy).

Fixtures:
- ``make_flow(body, frontend="openai_chat")``: a Flow from a wire body, ready for hooks.
- ``proxy_server(config, plugins=[...])``: an llmproxy server on a real socket; returns its
  base URL. ``plugins`` are extra plugin objects registered as if they were installed.

For a backend, configure the built-in ``offline`` provider (``mode: scripted`` plays the
replies you list, tool calls included) — a real provider, so the flow is exercised end to end.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from .codecs import get_codec
from .config import Config, parse_config
from .context import ProxyContext
from .flow import Flow
from .manager import PluginHost


def build_flow(body: dict[str, Any], frontend: str = "openai_chat") -> Flow:
    codec = get_codec(frontend)
    model, stream = codec.peek(body)
    return Flow(frontend, body, model, stream, request_decoder=codec.decode_request)


@pytest.fixture
def make_flow() -> Callable[..., Flow]:
    return build_flow


class RunningProxy:
    """A started llmproxy: ``url`` (no trailing slash), ``context``, ``stop()``."""

    def __init__(self, url: str, context: ProxyContext, runner: web.AppRunner) -> None:
        self.url = url
        self.context = context
        self._runner = runner

    async def stop(self) -> None:
        await self._runner.cleanup()


async def start_proxy(config: Config | dict[str, Any], plugins: list[tuple[str, Any]] | None = None, entry_points: bool = True) -> RunningProxy:
    from .app import create_app

    if isinstance(config, dict):
        config = parse_config(config, "<test>")
    host = PluginHost(config, entry_points=entry_points, extra=plugins or ())
    ctx = ProxyContext(config, host)
    app = create_app(ctx)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=config.proxy.drain_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return RunningProxy(f"http://127.0.0.1:{port}", ctx, runner)


@pytest.fixture
async def proxy_server() -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    started: list[RunningProxy] = []

    async def factory(config: Config | dict[str, Any], plugins: list[tuple[str, Any]] | None = None) -> RunningProxy:
        proxy = await start_proxy(config, plugins)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        await proxy.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_app(app: web.Application) -> tuple[str, web.AppRunner]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return f"http://127.0.0.1:{port}", runner


__all__ = ["RunningProxy", "build_flow", "free_port", "start_app", "start_proxy", "asyncio"]
