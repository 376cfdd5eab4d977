"""Hot reload: apply a changed config file without a restart and without dropping a request.

Triggered by a change of the config file (checked every ``proxy.reload_check`` seconds), by
SIGHUP, or by a call of :meth:`ProxyContext.reload` (the admin API's). The new file is read
and validated in full — YAML, every section, every plugin's settings, alias references,
pinned keys, client keys — and only then applied: backends whose section changed get new
provider instances (unchanged ones are kept, with their connection pools, key rest times
and discovery state), the router is rebuilt, plugins receive their new settings through
``configure``. Requests already running keep the providers they started with; a replaced
provider is closed once nothing runs on it any more. Anything invalid rejects the whole
file and the running config stays as it was.

What cannot change without a restart: ``proxy.host``, ``proxy.port``, ``proxy.anthropic_port``
(the sockets are bound) and which plugins are loaded (``plugins.load``, ``enabled``); a file
that changes them is rejected with that reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from .context import ProxyContext
    from .providers import Provider

log = logging.getLogger("llmproxy.reload")

# How often a replaced provider is checked for requests still running on it, and how long
# it is kept at most (a stream may last that long).
_RETIRE_CHECK = 0.5
_RETIRE_LIMIT = 3600.0


def _plugin_set(config: Config) -> tuple[tuple[str, ...], frozenset[str]]:
    disabled = frozenset(name for name in (config.plugins.model_extra or {}) if config.plugin_section(name).get("enabled") is False)
    return tuple(config.plugins.load), disabled


def restart_only_changes(old: Config, new: Config) -> list[str]:
    problems = []
    for key in ("host", "port", "anthropic_port"):
        if getattr(old.proxy, key) != getattr(new.proxy, key):
            problems.append(f"proxy.{key}: changed from {getattr(old.proxy, key)!r} to {getattr(new.proxy, key)!r}; the socket is bound: restart to apply")
    if _plugin_set(old) != _plugin_set(new):
        problems.append("plugins: which plugins are loaded or enabled changed; restart to apply")
    return problems


async def reload(ctx: "ProxyContext", config: Config | None = None) -> dict[str, Any]:
    """Validate and apply a new config (``config``, or the running config's file read
    again). Returns ``{"status": "applied" | "unchanged" | "rejected", "source", "problems",
    "changed"}``; never raises for a bad config."""
    async with ctx.reload_lock:
        old = ctx.config
        source = old.source
        if config is None:
            if not Path(source).is_file():
                return _rejected(source, [f"llmproxy was started without a config file ({source}); nothing to reload"])
            try:
                config = load_config(source)
            except ConfigError as error:
                return _rejected(source, error.problems)
        overrides = old.cli_overrides
        for key, value in overrides.items():
            setattr(config.proxy, key, value)
        config.cli_overrides = overrides
        problems = restart_only_changes(old, config)
        if problems:
            return _rejected(source, problems)
        changed = [key for key in ("proxy", "auth", "backends", "default_backend", "models", "plugins") if getattr(old, key) != getattr(config, key)]
        if not changed:
            return {"status": "unchanged", "source": source, "problems": [], "changed": []}
        try:
            return await _apply(ctx, old, config, changed)
        except ConfigError as error:
            return _rejected(source, error.problems)


async def _apply(ctx: "ProxyContext", old: Config, new: Config, changed: list[str]) -> dict[str, Any]:
    from .app import check_bind, client_keys
    from .router import Router

    host = ctx.host
    saved = {name: info.settings for name, info in host.plugins.items()}
    fresh: dict[str, Provider] = {}
    try:
        host.validate_settings(new)  # plugins' and backends' sections (sets each plugin's settings)
        check_bind(new)
        keys = client_keys(new)
        providers: dict[str, Provider] = {}
        for name, section in new.backends.items():
            kept = ctx.providers.get(name)
            if kept is not None and old.backends.get(name) == section:
                providers[name] = kept
                continue
            cls = host.provider_types[section["type"]]
            providers[name] = fresh[name] = cls(name, cls.Settings.model_validate(section), ctx)
        router = Router(new, providers, health=ctx.health)
    except ConfigError:
        _restore(host, saved)
        raise
    for provider in fresh.values():
        await provider.start()
    previous = (ctx.config, ctx.providers, ctx.router, ctx.client_keys)
    ctx.config, ctx.providers, ctx.router, ctx.client_keys = new, providers, router, keys
    try:
        await ctx.configure()
    except ConfigError:
        ctx.config, ctx.providers, ctx.router, ctx.client_keys = previous
        _restore(host, saved)
        await ctx.configure()
        for provider in fresh.values():
            await provider.close()
        raise
    ctx.health.span = new.proxy.rate_window
    ctx.sessions.ttl, ctx.sessions.max_sessions = new.proxy.session_ttl, new.proxy.max_sessions
    ctx.forget_redactor()
    logging.getLogger().setLevel(new.proxy.log_level.upper())
    retired = [p for name, p in previous[1].items() if providers.get(name) is not p]
    if retired:
        ctx.spawn(_retire(previous[2], retired))
    ctx.reloads += 1
    log.info("config reloaded from %s (changed: %s)", new.source, ", ".join(changed))
    return {"status": "applied", "source": new.source, "problems": [], "changed": changed}


def _restore(host: Any, saved: dict[str, Any]) -> None:
    for name, settings in saved.items():
        host.plugins[name].settings = settings


def _rejected(source: str, problems: list[str]) -> dict[str, Any]:
    log.error("config reload from %s rejected; the running config stays:\n  %s", source, "\n  ".join(problems))
    return {"status": "rejected", "source": source, "problems": problems, "changed": []}


async def _retire(router: Any, providers: list["Provider"]) -> None:
    """Close replaced providers once no request runs on them (their router's in-flight
    counts, kept by every attempt that began before the reload, reach zero)."""
    names = {p.name + ":" for p in providers}
    waited = 0.0
    while waited < _RETIRE_LIMIT and any(label.startswith(tuple(names)) for label in router.inflight):
        await asyncio.sleep(_RETIRE_CHECK)
        waited += _RETIRE_CHECK
    for provider in providers:
        try:
            await provider.close()
        except Exception:
            log.exception("closing replaced backend %s failed", provider.name)


async def watch(ctx: "ProxyContext", interval: float) -> None:
    """Reload whenever the config file's modification time or size changes."""
    path = ctx.config.source

    def signature() -> tuple[float, int] | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    seen = signature()
    while True:
        await asyncio.sleep(interval)
        now = signature()
        if now is not None and now != seen:
            seen = now
            await reload(ctx)
