"""ProxyContext: everything a running proxy shares — config, plugins, providers, router.

Built by the app factory and stored on the aiohttp app under :data:`CONTEXT`; passed to
plugins in ``configure``, ``startup`` and ``shutdown``. Tests build their own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from .config import Config
from .manager import HookChains, PluginHost, call_chain, call_chain_logged
from .providers import Provider
from .router import Router
from .sessions import SessionStore

log = logging.getLogger("llmproxy")


class ProxyContext:
    def __init__(self, config: Config, host: PluginHost) -> None:
        self.config = config
        self.host = host
        self.chains: HookChains = host.chains()
        self.providers: dict[str, Provider] = {}
        for name, section in config.backends.items():
            cls = host.provider_types[section["type"]]
            self.providers[name] = cls(name, cls.Settings.model_validate(section), self)
        self.router = Router(config, self.providers)
        self.state: dict[str, Any] = {}  # for plugins: keep per-proxy state under your name
        self.sessions = SessionStore(config.proxy.session_ttl, config.proxy.max_sessions)
        self.inflight: set[asyncio.Task[Any]] = set()  # requests being served, for the shutdown drain

    def settings(self, plugin: str) -> Any:
        """``plugin``'s validated settings (an instance of its settings model), or None."""
        info = self.host.plugins.get(plugin)
        return info.settings if info is not None else None

    async def start(self) -> None:
        for impl in self.chains.by_hook["configure"]:
            info = self.host.plugins[impl.plugin]
            await call_chain([impl], settings=info.settings, context=self)
        for provider in self.providers.values():
            await provider.start()
        await call_chain(self.chains.by_hook["startup"], context=self)

    async def stop(self) -> None:
        await call_chain_logged(self.chains.by_hook["shutdown"], context=self)
        for provider in self.providers.values():
            try:
                await provider.close()
            except Exception:
                log.exception("closing backend %s failed", provider.name)


CONTEXT = web.AppKey("llmproxy_context", ProxyContext)
