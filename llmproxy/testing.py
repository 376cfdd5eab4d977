"""Test kit for plugin authors (a pytest plugin, loaded automatically with llmproxy).

- ``plugin_context(config, plugins=[(name, plugin)])``: a configured ProxyContext (your
  plugin's settings validated from ``plugins.<name>`` and handed to its ``configure``),
  without a server.
- ``build_flow(body, frontend="openai_chat", context=None)`` (fixture ``make_flow``): a Flow
  from a wire body, attached to ``context`` when given, ready for your hooks.
- ``start_proxy(config, plugins=[...])`` (fixture ``proxy_server``): a real llmproxy on a
  real socket; returns a :class:`RunningProxy` (``.url``, ``.context``, ``.stop()``).
  ``plugins`` are plugin objects or modules registered as if they were installed.

For a backend, configure the built-in ``offline`` provider (``mode: scripted`` plays the
replies you list, tool calls included) — a real provider, so the flow is exercised end to end.
"""

from __future__ import annotations

import socket
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

try:  # async fixtures need pytest-asyncio (the "testing" extra); without it, plain pytest
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pragma: no cover - only without the extra
    async_fixture = pytest.fixture

from .codecs import get_codec
from .config import Config, parse_config
from .context import ProxyContext
from .flow import Flow
from .manager import PluginHost


async def plugin_context(config: Config | dict[str, Any], plugins: list[tuple[str, Any]] | None = None, entry_points: bool = True) -> ProxyContext:
    """A ProxyContext for ``config`` with ``plugins`` registered and configured."""
    if isinstance(config, dict):
        config = parse_config(config, "<test>")
    context = ProxyContext(config, PluginHost(config, entry_points=entry_points, extra=plugins or ()))
    await context.configure()
    return context


def build_flow(body: dict[str, Any], frontend: str = "openai_chat", context: ProxyContext | None = None) -> Flow:
    codec = get_codec(frontend)
    model, stream = codec.peek(body)
    flow = Flow(frontend, body, model, stream, request_decoder=codec.decode_request)
    if context is not None:
        flow.context = context
        flow.sessions = context.sessions
    return flow


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
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=config.proxy.drain_timeout, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return RunningProxy(f"http://127.0.0.1:{port}", ctx, runner)


@async_fixture
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


__all__ = ["RunningProxy", "build_flow", "free_port", "plugin_context", "start_app", "start_proxy"]
