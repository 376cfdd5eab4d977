"""Backend health and model discovery: polling each backend's model list in the background.

With ``discovery:`` in a backend's settings (off by default), its :class:`BackendPoller`
asks the backend for its model list (:meth:`HTTPProvider.list_models`: ``GET
{base_url}/models`` for OpenAI-compatible servers, Anthropic's ``/v1/models``, Gemini's
``models``, each with its own key header) once at start-up and then every ``interval``
seconds. A successful poll marks the backend healthy and keeps the names it listed
(``provider.discovered_models``, which ``GET /v1/models`` shows when the backend has no
``models:`` configured); ``unhealthy_after`` failed polls in a row mark it unhealthy, and
the next success healthy again. ``provider.healthy`` is None until a poll has decided.

Polls run in their own task and never hold up a request; the task is cancelled when the
provider closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from .errors import ProxyError

if TYPE_CHECKING:
    from .config import DiscoverySettings
    from .providers import HTTPProvider

log = logging.getLogger("llmproxy.discovery")


class BackendPoller:
    """Polls one backend's model list and keeps ``provider.healthy`` and
    ``provider.discovered_models`` up to date."""

    def __init__(self, provider: "HTTPProvider", settings: "DiscoverySettings") -> None:
        self.provider = provider
        self.settings = settings
        self.failures = 0  # failed polls in a row
        self.last_error: str | None = None
        self.last_poll: float | None = None  # time.monotonic() of the last poll's end
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"llmproxy discovery {self.provider.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.settings.interval)

    async def poll(self) -> None:
        """One poll: list the models and record the outcome (never raises)."""
        provider = self.provider
        try:
            async with asyncio.timeout(self.settings.timeout):
                names = await provider.list_models()
        except ProxyError as error:
            self._failed(f"{error.status}: {error.message}")
        except TimeoutError:
            self._failed(f"no model list within {self.settings.timeout:g}s")
        except Exception as error:  # a bug must not end the polling
            log.exception("backend %s: polling its model list failed", provider.name)
            self._failed(type(error).__name__)
        else:
            provider.discovered_models = names
            self.failures = 0
            self.last_error = None
            if provider.healthy is False:
                log.info("backend %s is healthy again (%d models listed)", provider.name, len(names))
            provider.healthy = True
        self.last_poll = time.monotonic()

    def _failed(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        provider = self.provider
        if self.failures >= self.settings.unhealthy_after and provider.healthy is not False:
            log.warning("backend %s is unhealthy: %d model-list polls failed in a row (last: %s)", provider.name, self.failures, why)
            provider.healthy = False

    def status(self) -> dict[str, Any]:
        polled = None if self.last_poll is None else round(time.monotonic() - self.last_poll, 3)
        return {
            "interval": self.settings.interval,
            "failures": self.failures,
            "last_error": self.last_error,
            "seconds_since_poll": polled,
            "discovered_models": self.provider.discovered_models,
        }
