"""ProxyContext: everything a running proxy shares — config, plugins, providers, router.

Built by the app factory and stored on the aiohttp app under :data:`CONTEXT`; passed to
plugins in ``configure``, ``startup`` and ``shutdown``. Tests build their own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any, Mapping

from aiohttp import web

from .codecs import get_codec
from .codecs.base import loads
from .config import Config, ConfigError
from .errors import ProxyError
from .manager import DeclarationError, HookChains, PluginHost, call_chain, call_chain_logged, declared_work
from .providers import Provider
from .redact import DEFAULT_PATTERNS, Pattern, Redactor, proxy_secrets
from .resilience import Health
from .router import Router
from .sessions import SessionStore
from .toolnames import METADATA_KEY as TOOL_NAMES
from .toolnames import restore_names

if TYPE_CHECKING:
    from .canonical import Response
    from .flow import Flow

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
        self.health = Health()  # breakers and rate windows, kept across reloads
        self.health.span = config.proxy.rate_window
        self.router = Router(config, self.providers, health=self.health)
        self.state: dict[str, Any] = {}  # for plugins: keep per-proxy state under your name
        self.client_keys: list[tuple[str, bytes]] = []  # (name, key) pairs, set by the app factory
        self.sessions = SessionStore(config.proxy.session_ttl, config.proxy.max_sessions)
        self.inflight: set[asyncio.Task[Any]] = set()  # requests being served, for the shutdown drain
        self.stopping = False  # set when the drain gives up on what is still running
        self._secrets: dict[str, tuple[tuple[str, ...], tuple[Pattern, ...]]] = {}
        self._redactor: Redactor | None = None
        self.reload_lock = asyncio.Lock()
        self.reloads = 0  # configs applied since start-up
        self._tasks: set[asyncio.Task[Any]] = set()

    async def reload(self, config: Config | None = None) -> dict[str, Any]:
        """Validate and apply a new config — ``config``, or the config file read again —
        without dropping requests; an invalid one is rejected and the old one stays. Returns
        ``{"status": "applied" | "unchanged" | "rejected", "problems": [...], "changed": [...]}``
        (see :mod:`llmproxy.reload`)."""
        from .reload import reload

        return await reload(self, config)

    def spawn(self, coro: Any) -> "asyncio.Task[Any]":
        """Run ``coro`` in the background for as long as the proxy runs (cancelled at stop)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def forget_redactor(self) -> None:
        """Rebuild :attr:`redactor` on next use (the keys it masks may have changed)."""
        self._redactor = None

    def settings(self, plugin: str) -> Any:
        """``plugin``'s validated settings (an instance of its settings model), or None."""
        info = self.host.plugins.get(plugin)
        return info.settings if info is not None else None

    async def resend(self, flow: "Flow") -> "Response":
        """Ask the backend again for ``flow`` and return its complete answer, decoded.

        For hooks that re-ask (an empty answer, an invalid tool call): change
        ``flow.request`` first, then ``flow.response = await flow.context.resend(flow)``.
        What is sent is the canonical request (never the client's raw body), routed with
        failover, through the ``upstream_request`` hooks, recorded as a new entry in
        ``flow.attempts``. The answer is never streamed; a stream processor raises
        :class:`~llmproxy.errors.RetryStream` instead. Backend failures raise ProxyError.
        """
        from .pipeline import dispatch  # the pipeline imports this module

        flow.request  # noqa: B018 - decode it: the raw body may not say what the hooks changed
        reply = await dispatch(flow, self, None)
        response = reply.response
        if response is None:
            try:
                data = reply.data if reply.data is not None else loads(reply.body or b"")
            except ValueError:
                backend = flow.target.backend if flow.target is not None else "?"
                raise ProxyError(502, f"backend {backend!r} sent a body that is not JSON") from None
            response = get_codec(reply.protocol).decode_response(data)
        restore_names(response, flow.metadata.get(TOOL_NAMES) or {})
        return response

    def backend_status(self) -> dict[str, dict[str, Any]]:
        """Every backend's :meth:`Provider.status` plus its targets' requests in flight
        (``{"backend:model": n}``), JSON-ready and free of key values."""
        now = time.monotonic()
        status = {}
        health = self.health
        for name, provider in self.providers.items():
            entry = provider.status()
            prefix = name + ":"
            entry["inflight"] = {label: n for label, n in self.router.inflight.items() if label.startswith(prefix)}
            entry["breakers"] = {label: b.status(now) for label, b in health.breakers.items() if label.startswith(prefix)}
            window = health.windows.get(f"backends.{name}")
            entry["limits"] = window.status(now) if window is not None else {}
            status[name] = entry
        return status

    def target_limits(self) -> dict[str, dict[str, Any]]:
        """The rate windows of alias targets (``models.<alias>[i]`` → rpm/tpm used and limit)."""
        now = time.monotonic()
        return {name: window.status(now) for name, window in self.health.windows.items() if name.startswith("models.")}

    def add_secrets(self, owner: str, values: Any = (), patterns: Any = ()) -> None:
        """Have :attr:`redactor` also mask ``values`` (literal strings) and ``patterns``
        (:class:`llmproxy.redact.Pattern`). Calling again for the same ``owner`` (a plugin
        name) replaces what it added before, so ``configure`` can call it on every reload."""
        self._secrets[owner] = (tuple(values), tuple(patterns))
        self._redactor = None

    @property
    def redactor(self) -> Redactor:
        """Masks what must never reach a log or a capture: every backend's and client's key,
        what plugins added with :meth:`add_secrets`, and the common key formats
        (``llmproxy.redact.DEFAULT_PATTERNS``). Built on first use, after start-up."""
        if self._redactor is None:
            values = list(proxy_secrets(self))
            patterns = list(DEFAULT_PATTERNS)
            for added, more in self._secrets.values():
                values.extend(added)
                patterns.extend(more)
            self._redactor = Redactor(values, patterns)
        return self._redactor

    async def configure(self) -> None:
        """Hand every plugin its settings; a plugin that refuses them is a config error.
        Then build the chains anew, without what the plugins said has nothing to do under
        these settings (see ``configure`` in llmproxy/hookspecs.py)."""
        work: dict[str, dict[str, str]] = {}
        for impl in self.chains.by_hook["configure"]:
            info = self.host.plugins[impl.plugin]
            arguments = {"settings": info.settings, "context": self}
            try:
                declared = impl.function(*[arguments[a] for a in impl.argnames])
                if inspect.isawaitable(declared):
                    declared = await declared
                if isinstance(declared, Mapping):
                    work[impl.plugin] = declared_work(declared, self.host.hooks_of(impl.plugin))
                elif declared is not None:  # configure returned something before it could declare
                    log.warning("plugins.%s: configure returned a %s, not a mapping of when its hooks have work; ignored", impl.plugin, type(declared).__name__)
            except DeclarationError as error:  # not the user's to fix: say whose it is
                raise ConfigError([f"plugins.{impl.plugin}: {error} — a bug in the plugin ({info.module} {info.version}, {info.origin}), not in your config: report it to its author, or set plugins.{impl.plugin}.enabled: false"], self.config.source) from None
            except Exception as error:  # the plugin's own words, as a config problem
                raise ConfigError([f"plugins.{impl.plugin}: {error}"], self.config.source) from None
        self.chains = self.host.chains(work)

    async def start(self) -> None:
        await self.configure()
        for provider in self.providers.values():
            await provider.start()
        for impl in self.chains.by_hook["startup"]:
            try:
                await call_chain([impl], context=self)
            except Exception as error:
                log.exception("plugin %s failed to start", impl.plugin)
                raise ConfigError([f"plugins.{impl.plugin}: failed to start: {type(error).__name__}: {error}"], self.config.source) from None

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        await call_chain_logged(self.chains.by_hook["shutdown"], context=self)
        for provider in self.providers.values():
            try:
                await provider.close()
            except Exception:
                log.exception("closing backend %s failed", provider.name)


CONTEXT = web.AppKey("llmproxy_context", ProxyContext)
