"""Model name → the ordered targets that may serve it.

A model is addressed as ``backend:model``, as an alias from ``models:``, or as a bare name
sent to ``default_backend``. Unknown names get a 404 that lists what exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ProxyError

if TYPE_CHECKING:
    from .config import Config
    from .providers import Provider


@dataclass(frozen=True, slots=True)
class Target:
    backend: str
    model: str
    provider: "Provider"

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.model}"


class Router:
    def __init__(self, config: "Config", providers: dict[str, "Provider"]) -> None:
        self.config = config
        self.providers = providers

    def resolve(self, name: str) -> list[Target]:
        alias = self.config.models.get(name)
        if alias is not None:
            targets = []
            for entry in alias.targets:
                backend, _, model = entry.target.partition(":")
                targets.append(Target(backend, model, self.providers[backend]))
            return targets
        backend, sep, model = name.partition(":")
        if sep and backend in self.providers and model:
            return [self._checked(backend, model, name)]
        default = self.config.default_backend
        if default is None:
            raise self._unknown(name, "no default_backend is configured")
        return [self._checked(default, name, name)]

    def _checked(self, backend: str, model: str, asked: str) -> Target:
        provider = self.providers[backend]
        if not provider.accepts_model(model):
            raise self._unknown(asked, f"backend {backend!r} serves only {', '.join(provider.models)}")
        return Target(backend, model, provider)

    def _unknown(self, name: str, why: str) -> ProxyError:
        known = self.known_models()
        listing = ", ".join(known[:50]) + (" …" if len(known) > 50 else "")
        return ProxyError(
            404,
            f"model {name!r} does not exist here ({why}). Available: {listing or 'none'}; "
            "address any backend's model as backend:model.",
            param="model",
            code="model_not_found",
        )

    def known_models(self) -> list[str]:
        """Aliases, then every backend's listed models as backend:model, then the default
        backend's models by their bare names."""
        names = list(self.config.models)
        for backend, provider in self.providers.items():
            names.extend(f"{backend}:{m}" for m in provider.models)
        default = self.config.default_backend
        if default in self.providers:
            names.extend(self.providers[default].models)
        return names
