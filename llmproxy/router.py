"""Model name → the ordered targets that may serve it.

A model is addressed as an alias from ``models:`` (an exact name, else the first wildcard
name that matches, in file order), as ``backend:model``, or as a bare name sent to
``default_backend``. Unknown names get a 404 that lists what exists.

An alias's ``strategy`` chooses the FIRST target of each request (``order``: always the
first listed; ``round_robin``; ``weighted``: smooth weighted round robin over ``weight``;
``random``: in proportion to ``weight``; ``least_busy``: fewest requests in flight;
``affinity``: for backends with ``max_concurrency``, a free slot with the target's model
loaded, else a free slot, else the shortest queue — see scheduling.py); the other targets
follow in their listed order as fallbacks. Every ordering an alias can produce
is built once, at start-up, so routing a request allocates nothing.
"""

from __future__ import annotations

import bisect
import fnmatch
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import ConfigError
from .errors import ProxyError

if TYPE_CHECKING:
    from .config import AliasTarget, Config, ModelAlias
    from .providers import Provider
    from .resilience import Health, RateWindow

_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class Target:
    """One way to serve a request: a backend's model, with what the config says of it."""

    backend: str
    model: str
    provider: "Provider"
    key_index: int | None = field(default=None, compare=False)  # a pinned key (no rotation)
    window: "RateWindow | None" = field(default=None, compare=False, repr=False)  # the alias target's rpm/tpm
    backend_window: "RateWindow | None" = field(default=None, compare=False, repr=False)  # the backend's rpm/tpm
    declared: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # capabilities the config declares
    label: str = field(init=False, compare=False, repr=False)  # "backend:model", built once

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", f"{self.backend}:{self.model}")

    @property
    def streams(self) -> bool:
        return self.declared is None or self.declared.get("streaming") is not False


def declared_capabilities(provider: "Provider", spec: "AliasTarget | None" = None) -> dict[str, Any] | None:
    """The backend's declared capabilities, overridden by the alias target's (None: none)."""
    declared: dict[str, Any] = {}
    if provider.settings.capabilities is not None:
        declared.update(provider.settings.capabilities.declared())
    if spec is not None and spec.capabilities is not None:
        declared.update(spec.capabilities.declared())
    return declared or None


class Alias:
    """One ``models:`` entry with its routing state."""

    __slots__ = ("name", "strategy", "targets", "orders", "weights", "cumulative", "current", "turn")

    def __init__(self, name: str, spec: "ModelAlias", providers: dict[str, "Provider"], health: "Health | None" = None) -> None:
        self.name = name
        self.strategy = spec.strategy
        targets = []
        for i, entry in enumerate(spec.targets):
            backend, _, model = entry.target.partition(":")
            provider = providers[backend]
            window = health.window(f"models.{name}[{i}]", entry.rpm, entry.tpm) if health is not None else None
            targets.append(Target(backend, model, provider, _key_index(provider, entry, f"models.{name}.targets[{i}].key"), window,
                                  backend_window(provider, health), declared_capabilities(provider, entry)))
        self.targets: tuple[Target, ...] = tuple(targets)
        # orders[i]: target i first, then the others as listed.
        self.orders: tuple[tuple[Target, ...], ...] = tuple(
            (t, *self.targets[:i], *self.targets[i + 1 :]) for i, t in enumerate(self.targets)
        )
        self.weights: tuple[float, ...] = tuple(entry.weight for entry in spec.targets)
        running, cumulative = 0.0, []
        for weight in self.weights:
            running += weight
            cumulative.append(running)
        self.cumulative = cumulative
        self.current = [0.0] * len(self.targets)  # smooth weighted round robin state
        self.turn = 0  # round robin position


def backend_window(provider: "Provider", health: "Health | None") -> "RateWindow | None":
    """The backend's own rpm/tpm window (shared by all its targets), when it has limits."""
    settings = provider.settings
    if health is None or (settings.rpm is None and settings.tpm is None):
        return None
    return health.window(f"backends.{provider.name}", settings.rpm, settings.tpm)


def _key_index(provider: "Provider", entry: "AliasTarget", path: str) -> int | None:
    if entry.key is None:
        return None
    names = list(getattr(provider, "key_names", ()))
    if entry.key in names:
        return names.index(entry.key)
    raise ConfigError([f"{path}: backend {provider.name!r} has no key named {entry.key!r} (its keys: {', '.join(names) or 'none'})"])


class Router:
    def __init__(self, config: "Config", providers: dict[str, "Provider"], rng: random.Random | None = None, health: "Health | None" = None) -> None:
        self.config = config
        self.providers = providers
        self.aliases: dict[str, Alias] = {}
        self.patterns: list[tuple[Callable[[str], Any], Alias]] = []  # in file order
        for name, spec in config.models.items():
            alias = Alias(name, spec, providers, health)
            if _GLOB.search(name):
                self.patterns.append((re.compile(fnmatch.translate(name)).match, alias))
            else:
                self.aliases[name] = alias
        # Requests in flight per target label ("backend:model"), kept by the pipeline's
        # failover around each attempt (a stream counts until it is closed).
        self.inflight: dict[str, int] = {}
        self.random = rng or random.Random()
        self.health = health
        # Names routed without an alias (backend:model, or bare to the default backend) →
        # their one target, so a busy name is not rebuilt per request; bounded, as clients
        # choose the names.
        self._direct_cache: dict[str, tuple[Target]] = {}

    # -- lookup ----------------------------------------------------------------------------
    def alias_for(self, name: str) -> Alias | None:
        """The alias ``name`` routes through: an exact alias, else (unless ``name`` is an
        explicit ``backend:model``) the first wildcard alias that matches it."""
        alias = self.aliases.get(name)
        if alias is not None or not self.patterns:
            return alias
        backend, sep, model = name.partition(":")
        if sep and model and backend in self.providers:
            return None
        for match, candidate in self.patterns:
            if match(name):
                return candidate
        return None

    def resolve(self, name: str) -> list[Target]:
        """The targets for ``name`` in their configured order, without choosing (no routing
        state changes: for plugins and endpoints that only ask what a name means)."""
        alias = self.alias_for(name)
        if alias is not None:
            return list(alias.targets)
        return list(self._direct(name))

    def route(self, name: str) -> Sequence[Target]:
        """The targets to try for one request, in order: the alias's strategy picks the first
        (and advances its state); the rest follow as listed."""
        alias = self.alias_for(name)
        if alias is None:
            return self._direct(name)
        if alias.strategy == "order" or len(alias.targets) == 1:
            return alias.targets
        return alias.orders[self._pick(alias)]

    def preview(self, name: str) -> Sequence[Target]:
        """The targets :meth:`route` would return for the next request, without advancing
        any strategy's state (``random``: the configured order)."""
        alias = self.alias_for(name)
        if alias is None:
            return self._direct(name)
        strategy = alias.strategy
        if strategy in ("order", "random") or len(alias.targets) == 1:
            return alias.targets
        if strategy == "round_robin":
            return alias.orders[alias.turn % len(alias.targets)]
        if strategy == "weighted":
            total = alias.cumulative[-1]
            current = [c + w for c, w in zip(alias.current, alias.weights)]
            return alias.orders[max(range(len(current)), key=lambda i: (current[i], -i))] if total else alias.targets
        return alias.orders[self._pick(alias)]  # least_busy reads state, changes none

    def _direct(self, name: str) -> tuple[Target]:
        cached = self._direct_cache.get(name)
        if cached is not None:
            return cached
        backend, sep, model = name.partition(":")
        if sep and backend in self.providers and model:
            target = self._checked(backend, model, name)
        else:
            default = self.config.default_backend
            if default is None:
                raise self._unknown(name, "no default_backend is configured")
            target = self._checked(default, name, name)
        if len(self._direct_cache) >= 1024:
            self._direct_cache.clear()
        found = self._direct_cache[name] = (target,)
        return found

    def _pick(self, alias: Alias) -> int:
        strategy = alias.strategy
        if strategy == "round_robin":
            index = alias.turn % len(alias.targets)
            alias.turn = index + 1
            return index
        if strategy == "weighted":
            # Smooth weighted round robin (nginx): deterministic, and interleaved rather
            # than bursty — weights 3:1 give a a b a, a a b a, …
            current, weights = alias.current, alias.weights
            best = 0
            for i, weight in enumerate(weights):
                current[i] += weight
                if current[i] > current[best]:
                    best = i
            current[best] -= alias.cumulative[-1]
            return best
        if strategy == "random":
            cumulative = alias.cumulative
            return min(bisect.bisect_right(cumulative, self.random.random() * cumulative[-1]), len(cumulative) - 1)
        if strategy == "least_busy":
            inflight = self.inflight
            best, fewest = 0, None
            for i, target in enumerate(alias.targets):
                busy = inflight.get(target.label, 0)
                if fewest is None or busy < fewest:
                    best, fewest = i, busy
                    if busy == 0:
                        break
            return best
        if strategy == "affinity":
            return _affinity_pick(alias.targets, self.inflight)
        return 0

    # -- in-flight bookkeeping ---------------------------------------------------------------
    def begin(self, target: Target) -> None:
        self.inflight[target.label] = self.inflight.get(target.label, 0) + 1

    def end(self, target: Target) -> None:
        left = self.inflight.get(target.label, 0) - 1
        if left > 0:
            self.inflight[target.label] = left
        else:
            self.inflight.pop(target.label, None)

    # -- errors and listings -------------------------------------------------------------------
    def _checked(self, backend: str, model: str, asked: str) -> Target:
        provider = self.providers[backend]
        if not provider.accepts_model(model):
            raise self._unknown(asked, f"backend {backend!r} serves only {', '.join(provider.models)}")
        return Target(backend, model, provider, backend_window=backend_window(provider, self.health), declared=declared_capabilities(provider))

    def _unknown(self, name: str, why: str) -> ProxyError:
        known = [alias.name for _, alias in self.patterns] + self.known_models()
        listing = ", ".join(known[:50]) + (" …" if len(known) > 50 else "")
        return ProxyError(
            404,
            f"model {name!r} does not exist here ({why}). Available: {listing or 'none'}; "
            "address any backend's model as backend:model.",
            param="model",
            code="model_not_found",
        )

    def known_models(self) -> list[str]:
        """Aliases (not wildcard ones: no client can send a pattern), then every backend's
        listed models as backend:model, then the default backend's models by bare name."""
        names = list(self.aliases)
        for backend, provider in self.providers.items():
            names.extend(f"{backend}:{m}" for m in provider.models)
        default = self.config.default_backend
        if default in self.providers:
            names.extend(self.providers[default].models)
        return names


def _affinity_pick(targets: Sequence[Target], inflight: dict[str, int]) -> int:
    """Model-affinity spreading over backends with a scheduler (``max_concurrency``): the
    first target whose backend has a free slot and the target's model loaded, else the one
    with a free slot and the fewest requests in flight, else the one with the shortest
    queue. A backend without a scheduler always has a free slot (it has no limit)."""
    best, best_rank = 0, None
    for i, target in enumerate(targets):
        scheduler = target.provider.scheduler
        if scheduler is None:
            rank = (1, inflight.get(target.label, 0))
        elif scheduler.free:
            if scheduler.loaded == target.model:
                return i
            rank = (1, scheduler.active)
        else:
            rank = (2, scheduler.queued)
        if best_rank is None or rank < best_rank:
            best, best_rank = i, rank
    return best
