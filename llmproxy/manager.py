"""Plugin loading and hook chains.

Every plugin — built-in, third-party, or a module named in the config — is found and
registered the same way: the ``llmproxy`` entry-point group, then ``plugins.load``. A plugin
that fails to import, or implements a hook that does not exist (a misspelling), stops
start-up with a message naming it. ``plugins.<name>.enabled: false`` leaves a plugin out.

:class:`HookChains` precomputes, per hook, the implementations in the order they run, so the
pipeline calls a chain with a plain loop (awaiting async implementations one by one) instead
of a pluggy call per use; it leaves out what a plugin's ``configure`` said has no work
(``declared_work``), in one set of chains for requests that offer tools and one for the rest.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable, Mapping

import pluggy
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .config import Config, ConfigError, format_validation_error

log = logging.getLogger("llmproxy.plugins")

ENTRY_POINT_GROUP = "llmproxy"
FLOW_HOOKS = ("request", "upstream_request", "response", "stream_start", "error", "flow_done")


class PluginLoadError(Exception):
    """A plugin could not be loaded; the message names it and says why."""


@dataclass
class PluginInfo:
    name: str
    origin: str  # "built-in", "entry point (dist)", or "config"
    version: str
    module: str
    obj: Any = None
    settings_model: type[BaseModel] | None = None
    settings: BaseModel | None = None
    providers: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Impl:
    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    hook: str = ""


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _origin(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "entry point", "unknown"
    name = dist.metadata["Name"]
    if name.lower() == "llmproxy":
        return "built-in", dist.version
    return f"entry point ({name})", dist.version


class PluginHost:
    """Owns the pluggy manager and what was learned while loading plugins."""

    def __init__(self, config: Config, *, entry_points: bool = True, extra: Iterable[tuple[str, Any]] = (), check_settings: bool = True) -> None:
        self.pm = pluggy.PluginManager("llmproxy")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.provider_types: dict[str, type] = {}
        self.provider_owner: dict[str, str] = {}
        disabled = {name for name in (config.plugins.model_extra or {}) if config.plugin_section(name).get("enabled") is False}

        candidates: list[tuple[str, Callable[[], Any], str, str, str]] = []
        if entry_points:
            for ep in _entry_points():
                origin, version = _origin(ep)
                candidates.append((ep.name, ep.load, origin, version, ep.value))
        for module_name in config.plugins.load:
            candidates.append((module_name.rsplit(".", 1)[-1], lambda m=module_name: importlib.import_module(m), "config", "-", module_name))
        for name, obj in extra:
            candidates.append((name, lambda o=obj: o, "test", "-", getattr(obj, "__name__", type(obj).__name__)))

        for name, load, origin, version, where in candidates:
            if name in disabled:
                self.plugins.setdefault(name, PluginInfo(name, origin + ", disabled", version, where))
                continue
            if name in self.plugins:
                raise PluginLoadError(f"plugin {name!r} ({where}) has the same name as one already loaded from {self.plugins[name].module}")
            try:
                obj = load()
            except Exception as error:  # any import failure must name the plugin
                raise PluginLoadError(f"plugin {name!r} ({where}) failed to import: {type(error).__name__}: {error}") from error
            try:
                self.pm.register(obj, name=name)
            except pluggy.PluginValidationError as error:
                raise PluginLoadError(f"plugin {name!r} ({where}): {error}") from error
            self.plugins[name] = PluginInfo(name, origin, version, where, obj)
        for hook in FLOW_HOOKS + ("configure", "startup", "shutdown"):
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.hookwrapper or impl.wrapper:
                    # chains are called one implementation at a time so async hooks see
                    # each other's changes; a wrapper cannot take part in that
                    raise PluginLoadError(f"plugin {impl.plugin_name!r}: {hook} is a wrapper; llmproxy's flow hooks take plain implementations")
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as error:
            plugin = self.pm.get_name(error.plugin) if error.plugin is not None else "?"
            raise PluginLoadError(f"plugin {plugin!r}: {error} (misspelled hook? see docs/hooks.md)") from error
        self._collect_providers()
        self.commands: dict[str, Any] = {}
        self._collect_commands()
        if check_settings:
            self.validate_settings(config)

    # -- registries ------------------------------------------------------------------------
    def _collect_providers(self) -> None:
        for impl in reversed(self.pm.hook.register_providers.get_hookimpls()):

            def register(type_name: str, cls: type, _owner: str = impl.plugin_name) -> None:
                if type_name in self.provider_types:
                    raise PluginLoadError(
                        f"plugin {_owner!r} registers provider type {type_name!r}, already registered by {self.provider_owner[type_name]!r}"
                    )
                self.provider_types[type_name] = cls
                self.provider_owner[type_name] = _owner
                self.plugins[_owner].providers.append(type_name)

            impl.function(register=register)

    def _collect_commands(self) -> None:
        from .commands import NAME, Command

        for impl in reversed(self.pm.hook.register_commands.get_hookimpls()):

            def register(name: str, handler: Callable[..., Any], help: str = "", _owner: str = impl.plugin_name) -> None:
                if not NAME.match(name):
                    raise PluginLoadError(f"plugin {_owner!r} registers command {name!r}: names are lower-case words")
                if name in self.commands:
                    raise PluginLoadError(f"plugin {_owner!r} registers command {name!r}, already registered by {self.commands[name].plugin!r}")
                self.commands[name] = Command(name, handler, help, _owner)

            impl.function(register=register)

    def validate_settings(self, config: Config) -> None:
        """Validate every ``plugins.<name>`` section with its plugin's model (and backends
        with their provider's), raising one ConfigError listing every problem."""
        problems: list[str] = []
        for impl in self.pm.hook.plugin_settings.get_hookimpls():
            self.plugins[impl.plugin_name].settings_model = impl.function()
        for name in config.plugins.model_extra or {}:
            section = config.plugins.model_extra[name]
            if name not in self.plugins:
                problems.append(f"{config.where('plugins.' + name)}plugins.{name}: no plugin named {name!r} is installed (loaded: {', '.join(sorted(self.plugins))})")
                continue
            if not isinstance(section, dict):
                problems.append(f"{config.where('plugins.' + name)}plugins.{name}: must be a mapping of settings")
            elif not isinstance(section.get("enabled", True), bool):
                # anything but false leaves the plugin on: say so rather than guess
                problems.append(f"{config.where(f'plugins.{name}.enabled')}plugins.{name}.enabled: must be true or false")
        for info in self.plugins.values():
            if info.obj is None:
                continue
            section = {k: v for k, v in config.plugin_section(info.name).items() if k != "enabled"}
            if info.settings_model is None:
                if section:
                    problems.append(f"{config.where('plugins.' + info.name)}plugins.{info.name}: this plugin takes no settings (only enabled: true/false)")
                continue
            unknown = [k for k in section if k not in info.settings_model.model_fields]
            if info.settings_model.model_config.get("extra") == "allow":
                unknown = []
            try:
                info.settings = info.settings_model.model_validate({k: v for k, v in section.items() if k not in unknown})
            except ValidationError as error:
                problems.extend(format_validation_error(error, f"plugins.{info.name}", config.lines))
            # a model that ignores extra keys would hide a misspelled setting
            for key in unknown:
                problems.append(f"{config.where(f'plugins.{info.name}.{key}')}plugins.{info.name}.{key}: unknown key")
        for backend, section in config.backends.items():
            cls = self.provider_types.get(section.get("type", ""))
            if cls is None:
                where = config.where(f"backends.{backend}.type")
                problems.append(
                    f"{where}backends.{backend}.type: unknown provider type {section.get('type')!r} (available: {', '.join(sorted(self.provider_types))})"
                )
                continue
            try:
                cls.Settings.model_validate(section)
            except ValidationError as error:
                problems.extend(format_validation_error(error, f"backends.{backend}", config.lines))
        if problems:
            raise ConfigError(problems, config.source)

    def env_keys(self) -> dict[str, str]:
        """Provider type → the key variable that adds it to the default config."""
        return {name: cls.env_key for name, cls in self.provider_types.items() if getattr(cls, "env_key", None)}

    def chains(self, work: dict[str, dict[str, str]] | None = None) -> "HookChains":
        """The chains, leaving out what ``work`` (plugin → hook → when, as ``configure``
        returned it) says has nothing to do."""
        return HookChains(self.pm, work or {})

    def hooks_of(self, name: str) -> list[str]:
        obj = self.plugins[name].obj
        if obj is None:
            return []
        return [hc.name for hc in self.pm.get_hookcallers(obj) or ()]


WORK_WHEN = ("always", "tools", "never")  # what ``configure`` may say of a flow hook (see hookspecs)


class DeclarationError(ValueError):
    """A plugin's ``configure`` said something wrong about when its hooks have work: a bug
    in the plugin, not in the user's config."""


def declared_work(declared: Any, hooks: list[str]) -> dict[str, str]:
    """Check what a plugin's ``configure`` returned: a mapping of some of its own flow hooks
    to a word of ``WORK_WHEN``. A mistake is the plugin author's: say exactly what it is."""
    if not isinstance(declared, Mapping):
        raise DeclarationError(f"configure returned {type(declared).__name__}; it may return None or a mapping of flow hook → 'always' | 'tools' | 'never'")
    for hook, when in declared.items():
        if hook not in FLOW_HOOKS or hook not in hooks:
            raise DeclarationError(
                f"configure says when {hook!r} has work, but the plugin implements no flow hook of that name "
                f"(it implements: {', '.join(h for h in FLOW_HOOKS if h in hooks) or 'none'}; the flow hooks are {', '.join(FLOW_HOOKS)})"
            )
        if not isinstance(when, str) or when not in WORK_WHEN:
            raise DeclarationError(f"configure says {hook!r} has work {when!r}; the choices are {', '.join(map(repr, WORK_WHEN))}")
    return dict(declared)


class HookChains:
    """Per hook, the implementations in run order (first to last).

    An implementation its plugin's ``configure`` declared ``"never"`` is in no chain; one
    declared ``"tools"`` only in these chains, not in :attr:`without_tools`, the chains of
    a request that offers no tools (:meth:`of` picks them per flow)."""

    def __init__(self, pm: pluggy.PluginManager, work: dict[str, dict[str, str]], tools: bool = True) -> None:
        self.by_hook: dict[str, list[Impl]] = {}
        self.tools_only: set[tuple[str, str]] = set()
        for name in FLOW_HOOKS + ("configure", "startup", "shutdown"):
            caller = getattr(pm.hook, name)
            impls = []
            for i in reversed(caller.get_hookimpls()):
                when = work.get(i.plugin_name, {}).get(name)
                if when == "tools":
                    self.tools_only.add((i.plugin_name, name))
                if when == "never" or (when == "tools" and not tools):
                    continue
                impls.append(Impl(i.plugin_name, i.function, tuple(i.argnames), name))
            self.by_hook[name] = impls
        self.request = self.by_hook["request"]
        self.upstream_request = self.by_hook["upstream_request"]
        self.response = self.by_hook["response"]
        self.stream_start = self.by_hook["stream_start"]
        self.error = self.by_hook["error"]
        self.flow_done = self.by_hook["flow_done"]
        self.without_tools: HookChains = HookChains(pm, work, tools=False) if tools and self.tools_only else self

    def of(self, flow: Any) -> "HookChains":
        """The chains that run for ``flow``: its client's request offers tools, or not."""
        return self if flow.raw_request.get("tools") else self.without_tools

    def order(self, hook: str) -> list[str]:
        return [impl.plugin for impl in self.by_hook.get(hook, ())]


_FLOW_ONLY = ("flow",)


async def call_chain(impls: list[Impl], stop: Callable[[], bool] | None = None, skip: frozenset[str] = frozenset(), **kwargs: Any) -> None:
    """Call each implementation in order, awaiting awaitables; stop early when ``stop()``;
    leave out the plugins named in ``skip`` (switched off for the flow's session).

    Exceptions propagate with the plugin's name attached as ``error.llmproxy_plugin``.
    A flow whose changes are traced (``flow.changes``, see llmproxy/flow.py) is handed to
    :func:`_call_traced` from the implementation where tracing began.
    """
    flow = kwargs.get("flow")
    for index, impl in enumerate(impls):
        if flow is not None and flow.changes is not None:
            await _call_traced(impls[index:], stop, skip, flow, kwargs)
            return
        if skip and impl.plugin in skip:
            continue
        try:
            # most implementations take just the flow and return None: skip the general work
            if impl.argnames == _FLOW_ONLY:
                result = impl.function(flow)
            else:
                result = impl.function(*[kwargs[a] for a in impl.argnames])
            if result is not None and inspect.isawaitable(result):
                await result
        except BaseException as error:
            if not hasattr(error, "llmproxy_plugin"):
                try:
                    error.llmproxy_plugin = impl.plugin  # type: ignore[attr-defined]
                except AttributeError:
                    pass
            raise
        if stop is not None and stop():
            return


_TRACED_HOOKS = frozenset(("request", "response"))


async def _call_traced(impls: list[Impl], stop: Callable[[], bool] | None, skip: frozenset[str], flow: Any, kwargs: dict[str, Any]) -> None:
    """:func:`call_chain` for a traced flow: snapshot the flow around each ``request`` and
    ``response`` implementation and record those that changed it in ``flow.changes``."""
    for impl in impls:
        if impl.plugin in skip:
            continue
        traced = impl.hook in _TRACED_HOOKS
        before = flow.snapshot(impl.hook) if traced else None
        try:
            result = impl.function(*[kwargs[a] for a in impl.argnames])
            if result is not None and inspect.isawaitable(result):
                await result
        except BaseException as error:
            if not hasattr(error, "llmproxy_plugin"):
                try:
                    error.llmproxy_plugin = impl.plugin  # type: ignore[attr-defined]
                except AttributeError:
                    pass
            raise
        finally:
            if traced:
                after = flow.snapshot(impl.hook)
                if after != before:
                    flow.changes.append((impl.hook, impl.plugin, before, after))
        if stop is not None and stop():
            return


async def call_chain_logged(impls: list[Impl], skip: frozenset[str] = frozenset(), **kwargs: Any) -> None:
    """Like :func:`call_chain`, but a failing implementation is logged and skipped."""
    for impl in impls:
        if impl.plugin in skip:
            continue
        try:
            result = impl.function(*[kwargs[a] for a in impl.argnames])
            if result is not None and inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("plugin %s failed in a hook; continuing", impl.plugin)


def describe(host: PluginHost, chains: HookChains | None = None) -> dict[str, Any]:
    """What `llmproxy plugins` prints: each plugin and each flow chain in run order — the
    configured ``chains`` when given: then also which implementations run only for requests
    that offer tools, and which have nothing to do under this config (in no chain)."""
    everything = host.chains()
    chains = chains or everything
    return {
        "plugins": [
            {
                "name": info.name,
                "version": info.version,
                "origin": info.origin,
                "module": info.module,
                "hooks": host.hooks_of(info.name),
                "providers": info.providers,
                "commands": sorted(c.name for c in host.commands.values() if c.plugin == info.name),
                "settings": info.settings_model.__name__ if info.settings_model else None,
            }
            for info in host.plugins.values()
        ],
        "chains": {hook: chains.order(hook) for hook in FLOW_HOOKS},
        "with_tools_only": {hook: [p for p in chains.order(hook) if (p, hook) in chains.tools_only] for hook in FLOW_HOOKS},
        "idle": {hook: [p for p in everything.order(hook) if p not in chains.order(hook)] for hook in FLOW_HOOKS},
    }
